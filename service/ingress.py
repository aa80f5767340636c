"""The ingress deployment of the Ray-ingress frontends (``ray-proxy``, ``ray-direct``).

Ray Serve delivers HTTP (the app of ``service/http_app.py``: REST and KServe v2 routes) and gRPC
(the methods of :class:`~service.grpc_ingress.GRPCMethods`) to it; it routes each request to
the model's own deployment (``service/deployment.py``) through a deployment handle.
"""

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from service import explorer, kserve_routes, rest_routes  # noqa: F401  (they register the routes on the app)
from service.grpc_ingress import GRPCMethods
from service.http_app import app, attach
from service.repository import ModelEntry
from service.routing import Model, RemoteModel
from service.settings import Settings


@serve.deployment
@serve.ingress(app)
class Ingress(GRPCMethods):
    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        entries: dict[str, ModelEntry],
        rejected: dict[str, str],
        settings: Settings,
    ) -> None:
        models: dict[str, Model] = {name: RemoteModel(h) for name, h in handles.items()}
        super().__init__(models, entries, rejected, settings)
        attach(self)


def ingress_options(settings: Settings) -> dict[str, Any]:
    return {
        "name": "ingress",
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0},
        "logging_config": settings.serve_logging,
        **settings.shutdown_options(),
    }
