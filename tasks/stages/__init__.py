"""One module per graph node; each has pure builders and a `tasks(ctx)` generator."""
