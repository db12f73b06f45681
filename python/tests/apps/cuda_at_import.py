"""A test app whose import initialises CUDA, which an app template must refuse: on a machine
without a GPU the call raises; with one it initialises CUDA and the template's checks refuse
it. Either way the error names the fix (``@zygote.post_fork``)."""

import torch
from flask import Flask

app = Flask(__name__)
torch.cuda.init()
