"""arcourse: tested reference implementations of autoregressive models, one module per topic.

The modules a learner reads are at the top level, each named for what it teaches and each
docstring naming its chapter. The course platform (grading, modes, authoring) is in
:mod:`arcourse.course`.
"""
