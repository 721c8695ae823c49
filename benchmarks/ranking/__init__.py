"""Research code for the rankers: behaviour-changing mutants and ranker quality."""
