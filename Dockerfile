# The csi-memfs node plugin image: a static csi-memfs binary and a static
# busybox for the tools mount-utils runs (mount, umount). `make image` builds
# the same image without Docker (hack/ociimage); this file is for the usual
# way:
#
#   docker build -t docker.io/csi-memfs/csi-memfs:dev .
#
# The layout matches hack/ociimage: /csi-memfs, /bin/busybox and its applet
# links in /bin, PATH=/bin.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=""
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.buildVersion=${VERSION}" \
      -o /rootfs/csi-memfs ./cmd/csi-memfs

FROM debian:bookworm-slim AS tools
RUN apt-get update && apt-get install -y --no-install-recommends busybox-static \
 && mkdir -p /rootfs/bin /rootfs/tmp /rootfs/etc \
 && chmod 1777 /rootfs/tmp \
 && cp /bin/busybox /rootfs/bin/busybox \
 && for a in sh mount umount ls cat df mkdir rm mv cp ln ps sleep grep find stat test echo du wget; do \
      ln -s busybox /rootfs/bin/$a; \
    done

FROM scratch
COPY --from=tools /rootfs/ /
COPY --from=build /rootfs/csi-memfs /csi-memfs
ENV PATH=/bin
ENTRYPOINT ["/csi-memfs"]
CMD ["serve"]
