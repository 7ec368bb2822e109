"""`dlsuite serve`: SavedModels served over TensorFlow Serving's REST API, with a page for people.

`repository` finds, loads and unloads model versions (no HTTP), `tensors`
turns TensorFlow Serving's JSON into tensors and back (no TensorFlow calls),
`server` is the aiohttp application, `page` the HTML page at `/`, and `cli`
the command line.
"""
