// Lists the API's endpoints from the server's own OpenAPI schema (no CDN, works offline).
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (className) node.className = className;
  return node;
}

(async () => {
  const schema = await (await fetch("/openapi.json")).json();
  const root = document.getElementById("endpoints");
  for (const [path, methods] of Object.entries(schema.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = element("figure");
      box.append(element("h2", `${method.toUpperCase()} ${path}`));
      if (op.description) box.append(element("p", op.description));
      for (const p of op.parameters || []) {
        const fallback = p.schema && "default" in p.schema ? ` (default ${p.schema.default})` : "";
        box.append(element("p", `${p.in} parameter ${p.name}: ${p.description || ""}${fallback}`, "muted"));
      }
      if (op.requestBody) {
        box.append(element("p", "body: " + Object.keys(op.requestBody.content).join(", "), "muted"));
      }
      const codes = Object.entries(op.responses || {}).map(([code, r]) => `${code} ${r.description}`);
      box.append(element("p", "responses: " + codes.join(" · "), "small"));
      root.append(box, element("br"));
    }
  }
})();
