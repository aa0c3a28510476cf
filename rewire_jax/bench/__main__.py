import sys

from ..hugepages import reexec_with_hugepages

reexec_with_hugepages(["-m", "rewire_jax.bench", *sys.argv[1:]])

from .run import main  # noqa: E402  (after the re-exec: nothing heavy imported before it)

sys.exit(main())
