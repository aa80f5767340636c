"""What one request and one client may ask of a replica: the ``limits`` section of the service's
settings (``ATTN_LIMITS__…``), read with them at start."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """What one request may ask for: applied at the API edge (``service/api/limits.py``), shown in
    the OpenAPI document and KServe model metadata. Each is at most the API schema's ceiling
    (``service/api/schemas.py``)."""

    model_config = ConfigDict(extra="forbid")  # an unknown name (a typo) stops the start

    max_text_chars: int = Field(512, ge=1, le=4096)
    max_texts: int = Field(64, ge=1, le=256)
    max_beam_size: int = Field(8, ge=1, le=64)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    max_top_k: int = Field(100, ge=1, le=1000)
    #: images in one request (a KServe v2 IMAGE / PIXELS batch; REST takes one): each holds a
    #: place in the model's queue, so a request larger than the queue could never be served
    max_images: int = Field(64, ge=1, le=4096)
    #: the largest answer a request may ask for, estimated up front from what it asks (texts ×
    #: decode length × source length, × layers × heads for every layer's attention): larger
    #: requests are refused with 422 before any work, not encoded into huge JSON
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    #: values in a JSON request body (REST, KServe v2 JSON), counted by their commas and brackets
    #: before it is parsed: each costs ≈ 0.15 µs of the replica's event loop
    #: (``service/api/json_body.py``). 1 Mi + 2 Ki takes a 1024 × 1024 grey image as pixels, or 6
    #: RGB images of 224 × 224 as a tensor; larger inputs travel encoded (PNG, JPEG) or in
    #: KServe's binary extension
    max_json_values: int = Field(1024 * 1024 + 2048, ge=64 * 1024)
    #: what protobuf would parse of a gRPC request value by value, in bytes of packed integers and
    #: booleans (KServe's typed INT/UINT/BOOL contents; past 5,000 fields each byte counts as 16,
    #: what a byte of fields may cost), measured from its tags before it is parsed: a byte costs
    #: 4–7 ns of the event loop (``service/api/grpc_parsing.py``). 2 MiB takes 6 RGB images of
    #: 224 × 224 as UINT8 contents; a bytes or string value (``raw_input_contents``, images) and
    #: FP32/FP64 contents count nothing
    max_grpc_value_bytes: int = Field(2 * 1024 * 1024, ge=64 * 1024)
    #: requests waiting in a model's queue beyond which new ones are shed with 503 (an image
    #: model's queue holds at least ``max_images``: ``service/settings/capacity.py``)
    max_queued_requests: int = Field(128, ge=1, le=1_000_000)
    request_timeout_s: float = Field(30.0, gt=0)
    #: shed a request at once (503 / RESOURCE_EXHAUSTED, Retry-After) when the work its model
    #: holds would not drain within 0.8 × ``request_timeout_s`` at the rate the model drained work
    #: while saturated, rather than queue it to be cut off there (``service/inference/admission.py``)
    shed_by_predicted_wait: bool = True
    #: HTTP (in-replica): a request's line and headers together; more is answered 431
    max_request_head_bytes: int = Field(64 * 1024, ge=4096, le=1024 * 1024)
    #: HTTP (in-replica): a request's line and headers must be in within this long of its first
    #: byte (a new connection's first request: of the connection), and its body may pause this
    #: long at most; else 408 and the connection closes, so slow clients cannot hold connections
    request_read_timeout_s: float = Field(10.0, ge=0.01, le=600)  # gRPC's preface wait: whole ms
    #: HTTP and gRPC (in-replica): open client connections per replica, each protocol its own;
    #: a new HTTP one beyond is answered 503 and closed, a gRPC one closed (its client sees
    #: UNAVAILABLE). File descriptors stay for the models and the repository. The gRPC preface
    #: must come within ``request_read_timeout_s`` too
    max_connections: int = Field(4096, ge=1, le=1_000_000)
    #: gRPC (in-replica): calls in progress per replica, an open stream counting as one for its
    #: whole life; one more is answered RESOURCE_EXHAUSTED at once. Health ``Watch`` streams
    #: (open to clients without the token) have a pool of their own of this size; the open unary
    #: RPCs (health ``Check``, ``ServerLive`` …) are not counted (``service/api/grpc_aio.py``)
    max_grpc_calls: int = Field(4096, ge=1, le=1_000_000)
    #: a streamed answer whose client stops reading: after this long blocked on one write, the
    #: stream ends and the request's rows leave the batch (nothing is buffered without bound);
    #: REST's streams, and the in-replica frontend's gRPC streams
    stream_write_timeout_s: float = Field(10.0, ge=0.1)  # its timer re-arms every quarter of it
