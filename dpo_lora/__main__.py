from dpo_lora.cli import main

raise SystemExit(main())
