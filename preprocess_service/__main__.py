"""``python -m preprocess_service``: the analysis service (same as ``mpmri-service``)."""

import sys

from preprocess_service.server import main

sys.exit(main())
