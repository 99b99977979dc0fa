"""What a model is trained on and how it is scored: the Task interface (``base``), its kinds
(classification, regression, extractive QA), one metrics module, and the sources that return
them (GLUE, SQuAD, the built-in offline tasks, the user's own files; ``registry`` picks one)."""
