from upmig.cli import main

raise SystemExit(main())
