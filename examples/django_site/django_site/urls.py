from django.http import HttpRequest, JsonResponse
from django.urls import path


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"django": "hello", "path": request.path})


urlpatterns = [path("hello", hello)]
