from bench.engine_bench import main

raise SystemExit(main())
