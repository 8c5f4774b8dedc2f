"""`python -m sprm_kernels.model.cli ...` = `sprm ...`."""

import sys

from sprm_kernels.model.cli.main import main

sys.exit(main())
