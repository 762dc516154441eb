import sys

from bloom.command_line.cli import main

sys.exit(main())
