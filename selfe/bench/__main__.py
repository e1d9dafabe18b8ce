"""``python -m selfe.bench``: the step timer (``selfe.bench.steptime``)."""

from selfe.bench.steptime import main

main()
