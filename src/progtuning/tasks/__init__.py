"""Where the data comes from and how it is scored: GLUE, SQuAD, built-in offline tasks, the user's own files."""
