from fracture_node.cli import main

raise SystemExit(main())
