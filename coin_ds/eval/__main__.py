import sys

from coin_ds.eval.run import main

sys.exit(main())
