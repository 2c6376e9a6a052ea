"""A real proxyless gRPC peer for Portico's tests (Python grpcio).

  grpc_xds.py server            serve /portico.test.Echo/Say on 127.0.0.1:<free port>;
                                prints the port, runs until stdin closes
  grpc_xds.py client NAME TEXT  call xds:///NAME with GRPC_XDS_BOOTSTRAP set;
                                prints the reply
"""
import sys
import time

import grpc

METHOD = "/portico.test.Echo/Say"


def serve():
    from concurrent import futures

    def say(request, context):
        return b"echo: " + request

    handler = grpc.method_handlers_generic_handler(
        "portico.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def call(name, text):
    # The first call waits for xDS to resolve (LDS, RDS, CDS, EDS).
    with grpc.insecure_channel("xds:///" + name) as channel:
        say = channel.unary_unary(METHOD)
        deadline = time.time() + 30
        while True:
            try:
                reply = say(text.encode(), timeout=10, wait_for_ready=True)
                print(reply.decode(), flush=True)
                return 0
            except grpc.RpcError as e:
                if time.time() > deadline:
                    print("call failed: %s %s" % (e.code(), e.details()), file=sys.stderr)
                    return 1
                time.sleep(0.2)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        sys.exit(call(sys.argv[2], sys.argv[3]))
