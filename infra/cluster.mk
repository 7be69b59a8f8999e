# A real cluster with `ray up` (included by the Makefile; README "Run on a real cluster"):
#   make cluster-up      token, repo copy, `ray up` (hosts: infra/host-setup.sh, infra/node.sh)
#   make cluster-deploy  `serve deploy` of SERVE_CONFIG to the head, wait, print the endpoint
#   make cluster-status  `ray status` and `serve status`
#   make cluster-down    Ray stopped on every host, `ray down`, then the token and repo copy
#                        deleted (`make clean` keeps them: only this knows the cluster is down)
# CLUSTER_YAML=infra/aws.yaml for AWS. CLUSTER_RUN must be where the YAML's file_mounts look.
CLUSTER_YAML ?= infra/onprem.yaml
SERVE_CONFIG ?= infra/serve.yaml
CLUSTER_RUN  ?= .run/cluster
CLUSTER_TOKEN = $(CLUSTER_RUN)/ray_auth_token
# the head's dashboard, where serve deploy goes; through `ray dashboard CLUSTER_YAML` (an ssh
# tunnel) set DASHBOARD=http://127.0.0.1:8265
DASHBOARD    ?=
# the CLIs talk to the cluster with its token (Ray 2.60 needs the mode named as well)
CLUSTER_AUTH  = RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(abspath $(CLUSTER_TOKEN))
HEAD_IP       = $$($(BIN)/ray get-head-ip $(CLUSTER_YAML) 2>/dev/null | tail -n1)

.PHONY: cluster-up cluster-deploy cluster-status cluster-down

cluster-up: $(BIN)/tandem
	$(BIN)/tandem model init
	@mkdir -p $(CLUSTER_RUN)
	@[ -s $(CLUSTER_TOKEN) ] || (umask 077 && $(BIN)/python -c \
		'import secrets; print(secrets.token_hex(32), end="")' > $(CLUSTER_TOKEN))
	rsync -a --delete --exclude=.git --filter=':- .gitignore' ./ $(CLUSTER_RUN)/src/
	$(BIN)/ray up -y --no-config-cache $(CLUSTER_YAML)

cluster-deploy: $(BIN)/tandem
	@head=$(HEAD_IP); dash=$(or $(DASHBOARD),http://$$head:8265); \
	port=$$($(BIN)/python -c 'import sys, yaml; \
		print((yaml.safe_load(open(sys.argv[1])).get("http_options") or {}).get("port", 8000))' \
		$(SERVE_CONFIG)); \
	set -x; $(CLUSTER_AUTH) $(BIN)/serve deploy $(SERVE_CONFIG) --address $$dash || exit 1; set +x; \
	for i in $$(seq 300); do \
		out=$$($(CLUSTER_AUTH) $(BIN)/serve status --address $$dash 2>/dev/null); \
		case "$$out" in *DEPLOY_FAILED*|*UNHEALTHY*) echo "$$out"; exit 1;; \
			*"status: RUNNING"*) echo "tandem is serving at http://$$head:$$port/v1" \
				"(OpenAI API)"; exit 0;; esac; \
		sleep 2; \
	done; echo "$$out"; echo "not RUNNING after 600 s" >&2; exit 1

cluster-status: $(BIN)/tandem
	$(BIN)/ray exec $(CLUSTER_YAML) 'ray status'
	@head=$(HEAD_IP); $(CLUSTER_AUTH) $(BIN)/serve status --address $(or $(DASHBOARD),http://$$head:8265)

cluster-down: $(BIN)/tandem
	-$(BIN)/ray exec $(CLUSTER_YAML) 'bash ~/tandem/infra/node.sh stop-workers'
	$(BIN)/ray down -y $(CLUSTER_YAML)
	rm -rf $(CLUSTER_TOKEN) $(CLUSTER_RUN)/src
	@rmdir $(CLUSTER_RUN) 2>/dev/null || true
