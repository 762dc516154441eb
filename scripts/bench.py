"""Same as `bloom bench`: ours and transformers' BLOOM side by side. Run with --help for the options."""

import sys

from bloom.command_line.bench import main

sys.exit(main())
