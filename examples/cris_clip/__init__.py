"""The reference RIS program (see README.md here). Its scripts import their siblings by plain name
(``from data import ...``), as a script run puts this folder first on ``sys.path``; ``model``,
``data``, ``synthetic`` and ``refer`` import no sibling at import time, so they also import as
``examples.cris_clip.<module>``."""
