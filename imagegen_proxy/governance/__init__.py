"""Who may do what: client keys, limits and budgets, prices."""
