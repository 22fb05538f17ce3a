"""One module per `vitlab` sub-command: `add_parser(subparsers)` declares it, `args.run(args)` executes it."""
