from pensieved.cli import main

main()
