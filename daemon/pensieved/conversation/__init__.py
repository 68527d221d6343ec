"""Role: request -> prompt tokens (template, pieces, tool formats); grammars, stops; text -> blocks.
Imports: pensieved.wire and pensieved.config only.
"""
