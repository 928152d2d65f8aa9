from forged.daemon import main

raise SystemExit(main())
