from ayt.cli import main

raise SystemExit(main())
