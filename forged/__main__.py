from forged.cli import main

raise SystemExit(main())
