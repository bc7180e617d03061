"""One module per `cmbdetect` sub-command: argument parsing and printing only."""
