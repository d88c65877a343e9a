from alb_proxy.cli import main

raise SystemExit(main())
