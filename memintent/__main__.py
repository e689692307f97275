from memintent.cli import main

raise SystemExit(main())
