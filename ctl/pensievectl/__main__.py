from pensievectl.cli import main

main()
