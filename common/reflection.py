"""Server reflection (grpcio-reflection's) that also resolves method names, for both tiers.

The protobuf descriptor pool finds no file for `package.Service.Method`, so grpcio-reflection
answers NOT_FOUND and `grpcurl describe llmserve.v1.GenerateService.Generate` fails
(grpc/grpc#34743). This servicer answers with the method's service's file instead.
"""

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

SERVICE_NAME = reflection.SERVICE_NAME


class ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's asyncio servicer, plus method symbols."""

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return response
        return self._file_by_filename(request, method.containing_service.file.name)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for `service_names` on `server` (list them with SERVICE_NAME)."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(service_names), server
    )
