"""Typed JSON bodies that are parsed after authentication, and documented in /openapi.json.

`body: Annotated[Model, JSONBody(Model)]` hands the route a validated `Model`. Unlike a plain
FastAPI body parameter, the body is read only once the dependencies declared before it (the
tenant key, the admin token) have passed, so nothing is parsed for strangers, and it is read
as JSON whatever Content-Type says (curl's `-d` sends form-urlencoded; the README's examples,
like vLLM's and OpenAI's, rely on that). Every failure is a 400 naming the field
(`server.deps.parse_json`). Routes of a `JSONBodyRoute` router declare the body in OpenAPI;
`install_openapi` adds the models to the document's components.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.deps import parse_json

M = TypeVar("M", bound=BaseModel)
_REF = "#/components/schemas/{model}"


def JSONBody(model: type[M], *, optional: bool = False) -> Any:
    """`optional`: an empty body stands for the model's defaults."""

    async def body(request: Request) -> M:
        if optional and not await request.body():
            return model()
        return await parse_json(request, model)

    body.body_model = model  # type: ignore[attr-defined]
    body.body_required = not optional  # type: ignore[attr-defined]
    return Depends(body)


class JSONBodyRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Coroutine[Any, Any, Any]],
                 **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.body_model: type[BaseModel] | None = None
        for dependency in self.dependant.dependencies:
            model = getattr(dependency.call, "body_model", None)
            if model is not None:
                self.body_model = model
                self.openapi_extra = {**(self.openapi_extra or {}), "requestBody": {
                    "required": dependency.call.body_required,  # type: ignore[union-attr]
                    "content": {"application/json": {
                        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def install_openapi(app: FastAPI) -> None:
    """Generate /openapi.json with the JSONBody models among its component schemas, and
    without FastAPI's 422 answers: validation errors are 400s in OpenAI's error shape."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            models = {route.body_model for route in app.routes
                      if isinstance(route, JSONBodyRoute) and route.body_model is not None}
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            for operations in schema["paths"].values():
                for op in operations.values():
                    op["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
