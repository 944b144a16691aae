package image

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

func TestKeychainFromSecrets(t *testing.T) {
	secret := `{"auths": {
		"https://index.docker.io/v1/": {"auth": "aHViOmh1YnB3"},
		"reg.example.com": {"username": "u1", "password": "p1"},
		"reg.example.com/team": {"username": "u2", "password": "p2"},
		"*.corp.example": {"username": "u3", "password": "p3"},
		"127.0.0.1:5000": {"identitytoken": "tok"}
	}}`
	kc, err := KeychainFromSecrets(map[string]string{DockerConfigJSONKey: secret})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		ref  string
		want authn.AuthConfig
	}{
		{"busybox", authn.AuthConfig{Username: "hub", Password: "hubpw"}},
		{"docker.io/library/busybox", authn.AuthConfig{Username: "hub", Password: "hubpw"}},
		{"reg.example.com/app", authn.AuthConfig{Username: "u1", Password: "p1"}},
		{"reg.example.com/team/app", authn.AuthConfig{Username: "u2", Password: "p2"}},
		{"reg.example.com/teamx/app", authn.AuthConfig{Username: "u1", Password: "p1"}},
		{"a.corp.example/app", authn.AuthConfig{Username: "u3", Password: "p3"}},
		{"a.b.corp.example/app", authn.AuthConfig{}},
		{"127.0.0.1:5000/app", authn.AuthConfig{IdentityToken: "tok"}},
		{"127.0.0.1:5001/app", authn.AuthConfig{}},
		{"other.example.com/app", authn.AuthConfig{}},
	}
	for _, tc := range tests {
		ref, err := name.ParseReference(tc.ref)
		if err != nil {
			t.Fatal(err)
		}
		a, err := kc.Resolve(ref.Context())
		if err != nil {
			t.Fatal(err)
		}
		got, err := a.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		if *got != tc.want {
			t.Errorf("%s: got %+v, want %+v", tc.ref, *got, tc.want)
		}
	}
}

func TestKeychainFromSecretsErrors(t *testing.T) {
	const pw = "Sup3rSecretValue"
	for _, secrets := range []map[string]string{
		{DockerConfigJSONKey: `{"auths": {"r": {"password": "` + pw + `"` /* truncated */},
		{DockerConfigJSONKey: `{"auths": {"r": {"password": ` + pw + `}}}`},
		{DockerConfigJSONKey: `{"auths": {"r": {"password": 1` + pw[:1] + `}}}`},
		{DockerConfigJSONKey: `{"auths": {"r": {"auth": "` + pw + `!"}}}`},
		{DockerCfgKey: `[` + pw + `]`},
	} {
		_, err := KeychainFromSecrets(secrets)
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("err = %v, want ErrInvalidArgument", err)
			continue
		}
		if strings.Contains(err.Error(), pw) || strings.Contains(err.Error(), pw[:4]) {
			t.Errorf("error leaks the secret: %v", err)
		}
	}
	// No pull secret: anonymous.
	kc, err := KeychainFromSecrets(nil)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := kc.Resolve(name.MustParseReference("busybox").Context())
	if a != authn.Anonymous {
		t.Errorf("no secret: %v, want anonymous", a)
	}
}
