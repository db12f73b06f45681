"""A test app whose post_fork function raises (as a bind that does not fit would)."""

from flask import Flask

import zygote

app = Flask(__name__)


@zygote.post_fork
def bind() -> None:
    raise ValueError("this post_fork fails on purpose (zygote test)")
