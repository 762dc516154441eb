"""The `bloom` command (cli), what its subcommands share (arguments) and `bloom bench` (bench): the top layer,
which imports from all the others."""
