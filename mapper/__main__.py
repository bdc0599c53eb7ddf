import sys

from mapper.entry import main

sys.exit(main())
