"""The neutral core of tensorslice: what the client and the server share.

It imports neither side, nor grpc:

    tensorslice.core.errors      the error hierarchy, each class with a `Status` of its own
    tensorslice.core.selection   the selection model (selectors, `Selection`) and its
                                 mapping to and from the protobuf messages
    tensorslice.core.codec       dtype codes, safetensors headers, `SliceChunk` framing
    tensorslice.core.results     result and description types (`TensorInfo`, `SlicePlan`...)
    tensorslice.core.parse       index expressions written as text (``"0:10, [1, 3]"``)
    tensorslice.core.credentials a client's token and TLS settings (arguments or environment)
    tensorslice.core.shards      the cluster spec, and selections split along dimension 0
                                 over a sharded tensor's pieces (and merged back)

`tensorslice.client` re-exports the names users need; the server imports them from here.
"""
