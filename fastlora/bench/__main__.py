from fastlora.bench.cli import main

raise SystemExit(main())
