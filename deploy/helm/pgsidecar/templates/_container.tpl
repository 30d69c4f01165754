{{/* The pgsidecar container, shared by the native and the legacy layout. */}}
{{- define "pgsidecar.container" -}}
{{- $r := .root -}}
image: {{ $r.Values.image.repository }}:{{ $r.Values.image.tag | default $r.Chart.AppVersion }}
imagePullPolicy: {{ $r.Values.image.pullPolicy }}
args: ["--config", "/etc/pgsidecar/proxy.yaml"]
ports:
  - name: postgres
    containerPort: {{ .listen }}
  - name: admin
    containerPort: {{ .admin }}
env:
  - name: PGSIDECAR_UPSTREAM_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "pgsidecar.secretName" $r }}
        key: upstream-password
  - name: PGSIDECAR_CLIENT_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "pgsidecar.secretName" $r }}
        key: client-password
  - name: PGSIDECAR_ADMIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "pgsidecar.secretName" $r }}
        key: admin-token
volumeMounts:
  - name: pgsidecar-config
    mountPath: /etc/pgsidecar
    readOnly: true
startupProbe:
  httpGet:
    path: /startupz
    port: admin
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 35
livenessProbe:
  httpGet:
    path: /livez
    port: admin
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
resources:
  requests:
    {{- toYaml $r.Values.sidecar.resources.requests | nindent 4 }}
  limits:
    cpu: {{ $r.Values.sidecar.resources.limits.cpu }}
    memory: {{ include "pgsidecar.memoryLimit" $r }}
securityContext:
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}
