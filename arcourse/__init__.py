"""arcourse: tested reference implementations of autoregressive models, one module per topic.

The modules a learner reads are at the top level, each named for what it teaches and each
docstring naming its chapter. The course platform (grading, modes, authoring) is in
:mod:`arcourse.course`.

Importing arcourse gives JAX one CPU device per core (unless you chose a count yourself, or JAX
has already started) so that training runs data-parallel on every core: see
:func:`arcourse.train.use_every_core`.
"""

from arcourse.train import use_every_core as _use_every_core

_use_every_core()
