"""The shipped model (this folder's files: a 0.79M-parameter policy with its SPR head and a BCE head), the task it
was trained on (`task`), the tiny random models the tests use (`tiny`) and the script that built it (`build`).

`SHIPPED_DIR` is the default `--model` of every command."""

import os

SHIPPED_DIR = os.path.dirname(os.path.abspath(__file__))
