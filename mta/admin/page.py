"""The live status page served at ``/`` on the admin listener.

One self-contained HTML document: no external script, style sheet, font or
image, so it works on a host with no internet.  Its script fetches
``/api/admin/status`` every two seconds and draws the numbers and the charts
(small hand-written SVG: line charts of the injection and delivery rates and of
the queue, bar charts of the queue by site and by pool).  Every number it shows
carries an ``id`` (``queue-messages``, ``rate-injection``, ...) so a browser test
can compare it with the API.  When the admin listener needs a token, open the
page as ``/#token=TOKEN``: the fragment never leaves the browser, and the script
sends it as ``Authorization: Bearer TOKEN`` with each API request.
"""

HTML = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mta status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:18px;margin:0}
#state{padding:2px 8px;border-radius:4px;background:#2e7d32}
#state.bad{background:#c62828}#state.drain{background:#ef6c00}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px;padding:12px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002}
h2{font-size:14px;margin:0 0 8px;color:#4a5468;text-transform:uppercase;letter-spacing:.04em}
.big{font-size:26px;font-weight:600}.unit{color:#6b7486;font-size:12px;margin-left:4px}
.kv{display:grid;grid-template-columns:auto 1fr;gap:2px 12px}.kv span:nth-child(odd){color:#6b7486}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:2px 6px;text-align:right;border-bottom:1px solid #eee}td:first-child,th:first-child{text-align:left}
svg{width:100%;height:120px;display:block}.err{color:#c62828}
.up{color:#2e7d32}.down{color:#c62828;font-weight:600}
</style></head>
<body>
<header><h1>mta</h1><span id="state">loading</span><span id="updated"></span>
<span id="error" class="err"></span></header>
<div id="problems" class="err" style="padding:6px 18px"></div>
<main>
<section><h2>Rates</h2>
<div class="kv"><span>injection</span><span><b id="rate-injection" class="big">-</b><span class="unit">msg/s</span></span>
<span>delivery</span><span><b id="rate-delivery" class="big">-</b><span class="unit">rcpt/s</span></span></div>
<svg id="chart-rates" viewBox="0 0 300 120" preserveAspectRatio="none"></svg>
<div><span style="color:#1565c0">&#9632; injection</span> <span style="color:#2e7d32">&#9632; delivery</span></div>
</section>
<section><h2>Totals</h2><div class="kv">
<span>accepted messages</span><span id="total-accepted">-</span>
<span>&nbsp; over SMTP</span><span id="total-accepted-smtp">-</span>
<span>&nbsp; over HTTP</span><span id="total-accepted-http">-</span>
<span>recipients delivered</span><span id="total-delivered">-</span>
<span>&nbsp; deferred</span><span id="total-deferred">-</span>
<span>&nbsp; failed</span><span id="total-failed">-</span>
<span>SMTP sessions open</span><span id="smtp-open">-</span></div></section>
<section><h2>Queue</h2><div class="kv">
<span>messages</span><span id="queue-messages" class="big">-</span>
<span>recipients</span><span id="queue-recipients">-</span>
<span>deferred</span><span id="queue-deferred">-</span>
<span>in flight</span><span id="queue-in-flight">-</span>
<span>bytes</span><span id="queue-bytes">-</span></div>
<svg id="chart-queue" viewBox="0 0 300 120" preserveAspectRatio="none"></svg></section>
<section><h2>Queue by site</h2><svg id="chart-sites" viewBox="0 0 300 120"></svg>
<table id="table-sites"></table></section>
<section><h2>Queue by pool</h2><svg id="chart-pools" viewBox="0 0 300 120"></svg>
<table id="table-pools"></table></section>
<section><h2>Latency</h2><table id="table-latency"></table></section>
<section><h2>Suspensions</h2><div id="suspensions-count" class="big">-</div>
<table id="table-suspensions"></table></section>
<section><h2>Processes</h2><div><span id="children-up">-</span> of
<span id="children-total">-</span> up</div><table id="table-processes"></table></section>
<section><h2>Disk and TCP</h2><div class="kv">
<span>spool free</span><span id="spool-free">-</span>
<span>device</span><span id="disk-device">-</span>
<span>reads / writes</span><span id="disk-io">-</span>
<span>written</span><span id="disk-written">-</span>
<span>I/O in progress</span><span id="disk-in-progress">-</span>
<span>TCP established</span><span id="tcp-established">-</span>
<span>TCP retransmits</span><span id="tcp-retrans">-</span>
<span>listen overflows / drops</span><span id="tcp-listen">-</span>
<span>resets sent</span><span id="tcp-resets">-</span></div></section>
</main>
<script>
"use strict";
var TOKEN = (location.hash.match(/token=([^&]+)/) || [])[1];
var NS = "http://www.w3.org/2000/svg";
function $(id){return document.getElementById(id);}
function partial(q){return q.not_answering.map(function(x){return "spool["+x.shard+"] not answering, not counted ("+x.error+")";}).concat(
  q.recovering.map(function(n){return "spool["+n+"] recovering (reading its queue: counted in part)";})).join("; ");}
function set(id, v){var e=$(id); if(e) e.textContent = (v===null||v===undefined) ? "-" : String(v);}
function num(v){return (v===null||v===undefined) ? "-" : String(Math.round(v*1000)/1000);}
function rate(v){return (v===null||v===undefined) ? "-" : v.toFixed(1);}
function bytes(v){if(v===null||v===undefined) return "-"; var u=["B","KiB","MiB","GiB","TiB"],i=0;
  while(v>=1024&&i<u.length-1){v/=1024;i++;} return (Math.round(v*10)/10)+" "+u[i];}
function ms(v){return (v===null||v===undefined) ? "-" : (Math.round(v*1e4)/10)+" ms";}
function el(tag, attrs, text){var e=document.createElementNS(NS, tag);
  for(var k in attrs) e.setAttribute(k, attrs[k]); if(text!==undefined) e.textContent=text; return e;}
function clear(e){while(e.firstChild) e.removeChild(e.firstChild);}
function lines(svg, series, colors){
  clear(svg); var W=300,H=120,max=1,n=0;
  series.forEach(function(s){s.forEach(function(v){if(v>max) max=v;}); if(s.length>n) n=s.length;});
  svg.appendChild(el("text",{x:2,y:10,"font-size":9,fill:"#6b7486"},num(max)));
  svg.appendChild(el("line",{x1:0,y1:H-1,x2:W,y2:H-1,stroke:"#ccc"}));
  series.forEach(function(s,j){ if(s.length<2) return; var pts=[];
    s.forEach(function(v,i){pts.push((i*W/(n-1)).toFixed(1)+","+(H-2-(v/max)*(H-14)).toFixed(1));});
    svg.appendChild(el("polyline",{points:pts.join(" "),fill:"none",stroke:colors[j],"stroke-width":1.5,"class":"series"}));});
}
function bars(svg, items){
  clear(svg); var W=300,H=120,max=1; items=items.slice(0,8);
  items.forEach(function(it){if(it[1]>max) max=it[1];});
  var bw=W/Math.max(items.length,1);
  items.forEach(function(it,i){var h=(it[1]/max)*(H-24);
    svg.appendChild(el("rect",{x:i*bw+4,y:H-12-h,width:bw-8,height:h,fill:"#5c6bc0","class":"bar"}));
    svg.appendChild(el("text",{x:i*bw+4,y:H-2,"font-size":8,fill:"#333"},String(it[0]).slice(0,18)));
    svg.appendChild(el("text",{x:i*bw+4,y:H-14-h,"font-size":9,fill:"#333"},String(it[1])));});
}
function table(id, head, rows){
  var t=$(id); clear(t); var tr=document.createElement("tr");
  head.forEach(function(h){var th=document.createElement("th"); th.textContent=h; tr.appendChild(th);});
  t.appendChild(tr);
  rows.forEach(function(r){var tr=document.createElement("tr");
    r.forEach(function(c){var td=document.createElement("td");
      if(c && c.cls){td.className=c.cls; td.textContent=c.text;} else td.textContent=(c===null||c===undefined)?"-":String(c);
      tr.appendChild(td);}); t.appendChild(tr);});
}
function render(d){
  var st=$("state");
  st.textContent = d.draining ? "draining" : (d.ok ? "ok" : "degraded");
  st.className = d.draining ? "drain" : (d.ok ? "" : "bad");
  set("updated", "updated " + new Date(d.time*1000).toLocaleTimeString());
  document.body.setAttribute("data-status-time", String(d.time));
  set("rate-injection", rate(d.rates.injection_per_second));
  set("rate-delivery", rate(d.rates.delivery_per_second));
  var t=d.totals;
  set("total-accepted", t.accepted_messages); set("total-accepted-smtp", t.accepted_smtp);
  set("total-accepted-http", t.accepted_http); set("total-delivered", t.delivered);
  set("total-deferred", t.deferred); set("total-failed", t.failed);
  set("smtp-open", t.smtp_connections_open);
  lines($("chart-rates"), [d.history.injection_rate, d.history.delivery_rate], ["#1565c0","#2e7d32"]);
  lines($("chart-queue"), [d.history.queue_messages], ["#6a1b9a"]);
  $("error").textContent = d.queue_error ? ("queue: " + d.queue_error) :
    (d.queue && d.queue.total.partial) ? ("queue: partial totals: " + partial(d.queue)) : "";
  var pr=$("problems"); clear(pr); (d.problems||[]).forEach(function(p){
    var e=document.createElement("div"); e.className="problem"; e.textContent=p; pr.appendChild(e);});
  if(d.queue){
    var q=d.queue.total;
    set("queue-messages", q.messages); set("queue-recipients", q.recipients);
    set("queue-deferred", q.deferred); set("queue-in-flight", q.in_flight); set("queue-bytes", bytes(q.bytes));
    var sites=Object.keys(d.queue.by_site).map(function(k){return [k, d.queue.by_site[k].queued, d.queue.by_site[k].connections];});
    sites.sort(function(a,b){return b[1]-a[1];});
    bars($("chart-sites"), sites); table("table-sites", ["site","queued","connections"], sites);
    var pools=Object.keys(d.queue.by_pool).map(function(k){return [k, d.queue.by_pool[k].messages, d.queue.by_pool[k].recipients];});
    pools.sort(function(a,b){return b[1]-a[1];});
    bars($("chart-pools"), pools); table("table-pools", ["pool","messages","recipients"], pools);
  }
  var lat=[]; Object.keys(d.latency_seconds).forEach(function(k){var l=d.latency_seconds[k];
    lat.push([k, l.count, ms(l.p50), ms(l.p90), ms(l.p99)]);});
  table("table-latency", ["", "count", "p50", "p90", "p99"], lat);
  set("suspensions-count", d.suspensions.length);
  table("table-suspensions", ["source","until","reason"], d.suspensions.map(function(s){
    return [s.source, s.until ? new Date(s.until*1000).toLocaleTimeString() : "-", s.reason];}));
  var up=d.processes.filter(function(p){return p.up;}).length;
  set("children-up", up); set("children-total", d.processes.length);
  table("table-processes", ["process","pid","state","restarts","cpu s","memory"], d.processes.map(function(p){
    var ok=p.up && p.healthy!==false;
    return [p.role+"["+p.index+"]", p.pid, {cls: ok ? "up" : "down", text: !p.up ? "DOWN" :
            (ok ? "up" : (p.role==="spool" ? "up, CANNOT WRITE" : "up, space low"))},
            p.restarts, num(p.cpu_seconds), bytes(p.memory_bytes)];}));
  set("spool-free", bytes(d.spool_free_bytes));
  set("disk-device", d.disk.device); set("disk-io", (d.disk.reads===undefined) ? "-" : d.disk.reads+" / "+d.disk.writes);
  set("disk-written", bytes(d.disk.written_bytes)); set("disk-in-progress", d.disk.in_progress);
  set("tcp-established", d.tcp.connections_established); set("tcp-retrans", d.tcp.retransmitted_segments);
  set("tcp-listen", d.tcp.listen_overflows+" / "+d.tcp.listen_drops); set("tcp-resets", d.tcp.resets_sent);
  document.body.setAttribute("data-rendered", String((+document.body.getAttribute("data-rendered")||0)+1));
}
function refresh(){
  var h={}; if(TOKEN) h.Authorization="Bearer "+decodeURIComponent(TOKEN);
  fetch("/api/admin/status", {headers:h, cache:"no-store"}).then(function(r){
    if(!r.ok) throw new Error("HTTP "+r.status); return r.json();
  }).then(render).catch(function(e){$("error").textContent=String(e); $("state").className="bad";})
    .then(function(){setTimeout(refresh, 2000);});
}
refresh();
</script></body></html>
"""
