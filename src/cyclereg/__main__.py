from cyclereg.cli import main

raise SystemExit(main())
