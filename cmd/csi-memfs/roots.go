package main

// The plugin's container image is scratch plus busybox, with an empty
// /etc: Go finds no trusted root certificates there, and every pull from
// an HTTPS registry would fail with "certificate signed by unknown
// authority". The fallback package ships the Mozilla root set and
// registers it with crypto/x509 as the roots to use only when the system
// has none (SSL_CERT_FILE and SSL_CERT_DIR still select system roots, and
// the image cache's CA bundle option adds the operator's own CAs).
import _ "golang.org/x/crypto/x509roots/fallback"
