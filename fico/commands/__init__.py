"""The command line (``fico run``, ``cost``, ``explain``, ``list``, ``bench``, ``ablate``,
``show``, ``eval``) and what only commands need: results files, timing, terminal output.

Commands import the library; nothing in the library imports a command.
"""
