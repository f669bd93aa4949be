from sparse_context.cli import main

raise SystemExit(main())
