import sys

from bloom.cli import main

sys.exit(main())
