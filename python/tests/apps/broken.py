"""A test app whose import fails."""

import zygote  # noqa: F401

raise RuntimeError("this app is broken on purpose (zygote test)")
