package driver

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/csi-memfs/csi-memfs/image"
	"github.com/csi-memfs/csi-memfs/volume"
)

// metricsPrefix starts every metric name.
const metricsPrefix = "csi_memfs_"

// volumeLabels label every per-volume series.
var volumeLabels = []string{"volume_id", "pod_namespace", "pod_name"}

// metrics are the driver's Prometheus collectors, on a registry of their
// own (no global state).
type metrics struct {
	// reg is the registry /metrics serves. Immutable.
	reg *prometheus.Registry
	// samples reads the volumes at scrape time. Immutable.
	samples func() []volumeSample
	// budget is the node's budget. Immutable pointer.
	budget *budget
	// images is the node's image cache; nil until New opens it, before
	// anything scrapes. Set once.
	images *image.Cache

	// rpcTotal counts CSI calls by method and gRPC code.
	rpcTotal *prometheus.CounterVec
	// rpcSeconds is the latency of CSI calls by method.
	rpcSeconds *prometheus.HistogramVec
	// pulls counts image pull attempts by result; pullSeconds and
	// pullBytes observe their durations and the bytes they fetched.
	pulls       *prometheus.CounterVec
	pullSeconds *prometheus.HistogramVec
	pullBytes   prometheus.Counter
	// takeovers counts the starts that took volumes over from a previous
	// process, by source (handover, holder); takeoverPause observes how
	// long serving paused for it; recovered and lost count the volumes
	// served again and those left lost. handovers counts the handovers
	// this process gave, by result.
	takeovers, handovers *prometheus.CounterVec
	takeoverPause        *prometheus.HistogramVec
	recovered, lost      prometheus.Counter
	// registered is 1 when kubelet's last verdict on the built-in
	// registration accepted it; registrations counts the verdicts by
	// result. Registered only with the built-in registrar.
	registered    prometheus.Gauge
	registrations *prometheus.CounterVec
	// fuse observes FUSE requests of every volume. Immutable pointer.
	fuse *fuseObserver
	// retiredSealViolations sums the seal violations of unpublished
	// volumes, so the node total never goes down. Accessed atomically.
	retiredSealViolations atomic.Uint64
	// retiredPanics sums the handler panics of unpublished volumes.
	// Accessed atomically.
	retiredPanics atomic.Uint64
	// forcedUnmounts counts unpublishes that ended a busy connection.
	forcedUnmounts prometheus.Counter

	// Descriptions of the series collect computes at scrape time.
	volBytesUsed, volBytesLimit, volInodesUsed, volInodesLimit *prometheus.Desc
	volCopiedUp, volSealViolations, volPassthrough, volLost    *prometheus.Desc
	volMetaBytes, volPanics, volDegraded, nodeDegraded         *prometheus.Desc
	volIOUring                                                 *prometheus.Desc
	nodeVolumes, nodeBytesUsed, nodeBytesReserved, nodeBudget  *prometheus.Desc
	nodeMaxVolumes, sealViolations, panics                     *prometheus.Desc
	imageBytes, imageImages, imagePinned, imageBudget          *prometheus.Desc
	imageInFlight, imageHits, imageEvictions                   *prometheus.Desc
}

// newMetrics returns the collectors of volumes read by samples and of
// budget; registration adds those of the built-in kubelet registrar.
func newMetrics(samples func() []volumeSample, budget *budget, registration bool) *metrics {
	vol := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(metricsPrefix+name, help, volumeLabels, nil)
	}
	node := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(metricsPrefix+name, help, labels, nil)
	}
	m := &metrics{
		reg:     prometheus.NewRegistry(),
		samples: samples,
		budget:  budget,
		rpcTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricsPrefix + "csi_operations_total",
			Help: "CSI calls served, by method and gRPC status code (OK for success).",
		}, []string{"method", "code"}),
		rpcSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricsPrefix + "csi_operation_duration_seconds",
			Help:    "Time to serve a CSI call, by method (NodePublishVolume is publish-to-ready) and gRPC status code.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16), // 0.5 ms .. 16 s
		}, []string{"method", "code"}),
		pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricsPrefix + "image_pulls_total",
			Help: "Image pull attempts that reached the image's source, by result (success, not_found, unauthorized, unavailable, ...).",
		}, []string{"result"}),
		pullSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricsPrefix + "image_pull_duration_seconds",
			Help:    "Time from resolving an image at its source to its tree being ready in the cache, by result.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14), // 50 ms .. 7 min
		}, []string{"result"}),
		takeovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricsPrefix + "takeovers_total",
			Help: "Starts of the plugin that took the volumes over from a previous process, by source: handover (a planned upgrade) or holder (after a crash).",
		}, []string{"from"}),
		takeoverPause: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricsPrefix + "takeover_pause_seconds",
			Help:    "How long the volumes went unserved while this process took them over, by source: from the predecessor stopping them (handover) or this process's start (holder: the crash came earlier) to this process serving them all.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16), // 1 ms .. 33 s
		}, []string{"from"}),
		forcedUnmounts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricsPrefix + "forced_unmounts_total",
			Help: "Unpublishes that ended a volume's FUSE connection while files on it were still open (those files get errors from then on).",
		}),
		recovered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricsPrefix + "volumes_recovered_total",
			Help: "Volumes of a previous plugin process this process serves again.",
		}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricsPrefix + "volumes_lost_total",
			Help: "Volumes of a previous plugin process that could not be served again (their pods see ENOTCONN): no session kept them, or their journal record was unreadable; should stay 0.",
		}),
		handovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricsPrefix + "handovers_total",
			Help: "Planned handovers of this process's volumes to a successor, by result (ok, failed).",
		}, []string{"result"}),
		registered: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricsPrefix + "kubelet_registered",
			Help: "1 when kubelet accepted the plugin's registration (built-in registrar), 0 when it refused it or has not answered.",
		}),
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricsPrefix + "kubelet_registrations_total",
			Help: "kubelet's verdicts on the plugin's registration (built-in registrar), by result (accepted, refused); a refused one is offered again.",
		}, []string{"result"}),
		pullBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricsPrefix + "image_pull_bytes_total",
			Help: "Compressed image bytes fetched by pulls.",
		}),
		fuse: &fuseObserver{
			seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
				Name: metricsPrefix + "fuse_operation_duration_seconds",
				Help: "Time to serve a FUSE request, by operation (LOOKUP, OPEN, READ, ...), all volumes together; " +
					"the _count series counts the operations.",
				Buckets: prometheus.ExponentialBuckets(0.000005, 4, 10), // 5 us .. 1.3 s
			}, []string{"op"}),
			errors: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: metricsPrefix + "fuse_operation_errors_total",
				Help: "FUSE requests answered with an error, by operation and errno name.",
			}, []string{"op", "errno"}),
		},

		volBytesUsed:      vol("volume_used_bytes", "Bytes the volume's memory layer uses (as df in the pod shows)."),
		volBytesLimit:     vol("volume_limit_bytes", "Byte limit of the volume's memory layer (its size attribute)."),
		volInodesUsed:     vol("volume_inodes_used", "Inodes the volume's memory layer uses."),
		volInodesLimit:    vol("volume_inodes_limit", "Inode limit of the volume's memory layer."),
		volCopiedUp:       vol("volume_copied_up_bytes", "Bytes copied up from the volume's image lower layer into memory."),
		volSealViolations: vol("volume_seal_violations_total", "Operations on the volume refused because a file was sealed."),
		volPassthrough:    vol("volume_passthrough", "1 while the volume's file data moves by FUSE passthrough, 0 when the daemon serves it."),
		volLost:           vol("volume_lost", "1 for a volume whose FUSE server died with a previous plugin process (its pod sees ENOTCONN) until it is unpublished."),
		nodeVolumes:       node("node_volumes", "Volumes on the node, by state (published, lost).", "state"),
		nodeBytesUsed:     node("node_used_bytes", "Bytes used by all volumes' memory layers on the node."),
		nodeBytesReserved: node("node_reserved_bytes", "Sum of the sizes of the node's volumes, counted against the budget."),
		nodeBudget:        node("node_budget_bytes", "The node memory budget (flag --node-memory-budget); 0 means none."),
		nodeMaxVolumes:    node("node_max_volumes", "The node's volume limit (flag --max-volumes); 0 means none."),
		sealViolations:    node("seal_violations_total", "Operations refused because a file was sealed, all volumes, published or since unpublished."),
		volIOUring:        vol("volume_io_uring", "1 while the volume's FUSE requests come over io_uring (--fuse-transport), 0 over /dev/fuse."),
		volMetaBytes:      vol("volume_metadata_bytes", "Part of the volume's used bytes charged for its inodes and extended attributes."),
		volPanics:         vol("volume_fuse_handler_panics_total", "FUSE requests on the volume whose handler panicked (answered EIO); should stay 0."),
		volDegraded: prometheus.NewDesc(metricsPrefix+"volume_degraded",
			"1 for each reason the volume is degraded: no_passthrough (passthrough wanted, the kernel refused it: the plugin moves the data and is charged its pages), "+
				"no_resend (the kernel lacks FUSE_NOTIFY_RESEND, Linux < 6.9: a plugin crash can leave callers hung until the volume is unmounted).",
			append(append([]string(nil), volumeLabels...), "reason"), nil),
		nodeDegraded:   node("node_degraded_volumes", "Published volumes that are degraded (csi_memfs_volume_degraded); should stay 0."),
		panics:         node("fuse_handler_panics_total", "FUSE requests whose handler panicked (answered EIO), all volumes, published or since unpublished; should stay 0."),
		imageBytes:     node("image_cache_bytes", "Disk used by the flattened images in the node's image cache."),
		imageImages:    node("image_cache_images", "Images in the node's image cache."),
		imagePinned:    node("image_cache_images_in_use", "Images of the cache that volumes use (never collected)."),
		imageBudget:    node("image_cache_budget_bytes", "The image cache budget (flag --image-cache-budget); 0 means none."),
		imageInFlight:  node("image_pulls_in_flight", "Image pulls running now."),
		imageHits:      node("image_cache_hits_total", "Image requests answered from the cache without a pull."),
		imageEvictions: node("image_cache_evictions_total", "Unused images collected to keep the cache within its budget."),
	}
	// Every documented series exists from the start, at 0.
	for _, from := range []string{"handover", "holder"} {
		m.takeovers.WithLabelValues(from)
		m.takeoverPause.WithLabelValues(from)
	}
	for _, result := range []string{"ok", "failed"} {
		m.handovers.WithLabelValues(result)
	}
	m.reg.MustRegister(m.rpcTotal, m.rpcSeconds, m.pulls, m.pullSeconds, m.pullBytes, m.fuse.seconds, m.fuse.errors, m,
		m.takeovers, m.takeoverPause, m.recovered, m.lost, m.handovers, m.forcedUnmounts,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if registration {
		m.reg.MustRegister(m.registered, m.registrations)
	}
	return m
}

// observeRegistration records kubelet's verdict on the registration.
func (m *metrics) observeRegistration(registered bool, _ string) {
	result, v := "refused", 0.0
	if registered {
		result, v = "accepted", 1
	}
	m.registrations.WithLabelValues(result).Inc()
	m.registered.Set(v)
}

// observeRPC records one CSI call.
func (m *metrics) observeRPC(method string, code codes.Code, d time.Duration) {
	m.rpcTotal.WithLabelValues(method, code.String()).Inc()
	m.rpcSeconds.WithLabelValues(method, code.String()).Observe(d.Seconds())
}

// observePull records one image pull attempt (image.Config.OnPull).
func (m *metrics) observePull(e image.PullEvent) {
	m.pulls.WithLabelValues(string(e.Result)).Inc()
	m.pullSeconds.WithLabelValues(string(e.Result)).Observe(e.Duration.Seconds())
	m.pullBytes.Add(float64(e.Bytes))
}

// observeTakeover records a start that took volumes over from a previous
// process.
func (m *metrics) observeTakeover(from string, pause time.Duration, recovered int) {
	m.takeovers.WithLabelValues(from).Inc()
	m.takeoverPause.WithLabelValues(from).Observe(pause.Seconds())
	m.recovered.Add(float64(recovered))
}

// retire keeps the seal violations of a volume about to be closed in the
// node total.
func (m *metrics) retire(v *volume.Volume) {
	m.retiredSealViolations.Add(v.SealViolations())
	m.retiredPanics.Add(v.Panics())
	if v.Forced() {
		m.forcedUnmounts.Inc()
	}
}

// Describe implements prometheus.Collector for the series computed at
// scrape time.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.volBytesUsed, m.volBytesLimit, m.volInodesUsed, m.volInodesLimit,
		m.volCopiedUp, m.volSealViolations, m.volPassthrough, m.volLost, m.volIOUring, m.volMetaBytes, m.volPanics, m.volDegraded, m.nodeDegraded, m.panics, m.nodeVolumes, m.nodeBytesUsed,
		m.nodeBytesReserved, m.nodeBudget, m.nodeMaxVolumes, m.sealViolations, m.imageBytes, m.imageImages,
		m.imagePinned, m.imageBudget, m.imageInFlight, m.imageHits, m.imageEvictions} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: the registry's volumes as they
// are now, so an unpublished volume's series are gone at the next scrape.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	var published, lost, used, degraded float64
	sealed, panics := m.retiredSealViolations.Load(), m.retiredPanics.Load()
	for _, s := range m.samples() {
		labels := []string{s.id, s.podNamespace, s.podName}
		if s.lost {
			lost++
			gauge(m.volLost, 1, labels...)
			if !s.held {
				continue
			}
		} else {
			published++
			gauge(m.volLost, 0, labels...)
			gauge(m.volPassthrough, b2f(s.passthrough), labels...)
			gauge(m.volIOUring, b2f(s.transport == "io-uring"), labels...)
			for _, r := range s.degraded {
				gauge(m.volDegraded, 1, append(labels, r)...)
			}
			if len(s.degraded) > 0 {
				degraded++
			}
			ch <- prometheus.MustNewConstMetric(m.volSealViolations, prometheus.CounterValue, float64(s.sealViolations), labels...)
			sealed += s.sealViolations
			ch <- prometheus.MustNewConstMetric(m.volPanics, prometheus.CounterValue, float64(s.panics), labels...)
			panics += s.panics
		}
		gauge(m.volBytesUsed, float64(s.u.BytesUsed), labels...)
		gauge(m.volBytesLimit, float64(s.u.BytesLimit), labels...)
		gauge(m.volInodesUsed, float64(s.u.InodesUsed), labels...)
		gauge(m.volInodesLimit, float64(s.u.InodesLimit), labels...)
		gauge(m.volCopiedUp, float64(s.u.CopiedUpBytes), labels...)
		gauge(m.volMetaBytes, float64(s.u.MetaBytes), labels...)
		used += float64(s.u.BytesUsed)
	}
	gauge(m.nodeVolumes, published, "published")
	gauge(m.nodeVolumes, lost, "lost")
	gauge(m.nodeBytesUsed, used)
	gauge(m.nodeDegraded, degraded)
	gauge(m.nodeBytesReserved, float64(m.budget.bytes.Load()))
	gauge(m.nodeBudget, float64(m.budget.limit))
	gauge(m.nodeMaxVolumes, float64(m.budget.maxVolumes))
	ch <- prometheus.MustNewConstMetric(m.sealViolations, prometheus.CounterValue, float64(sealed))
	ch <- prometheus.MustNewConstMetric(m.panics, prometheus.CounterValue, float64(panics))
	if m.images != nil {
		st := m.images.Stats()
		gauge(m.imageBytes, float64(st.Bytes))
		gauge(m.imageImages, float64(st.Images))
		gauge(m.imagePinned, float64(st.Pinned))
		gauge(m.imageBudget, float64(st.Budget))
		gauge(m.imageInFlight, float64(st.InFlight))
		ch <- prometheus.MustNewConstMetric(m.imageHits, prometheus.CounterValue, float64(st.Hits))
		ch <- prometheus.MustNewConstMetric(m.imageEvictions, prometheus.CounterValue, float64(st.Evictions))
	}
}

// volumeSample is what a scrape reports of one volume.
type volumeSample struct {
	id, podNamespace, podName string
	// lost: the volume is a previous process's that no session serves.
	lost bool
	// held: a lost volume's memory layer is still mounted.
	held           bool
	u              volume.Usage
	passthrough    bool
	sealViolations uint64
	panics         uint64
	transport      string
	// degraded lists why the volume is degraded (degradedReasons).
	degraded []string
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// handler serves /metrics, /healthz (200 while healthy returns nil, else
// 503 with its error, for the livenessprobe sidecar or a plain httpGet
// probe) and volumes on /volumes.
func (m *metrics) handler(healthy func() error, volumes http.HandlerFunc) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/volumes", volumes)
	return mux
}

// fuseObserver feeds the FUSE operation metrics (fusefs.Observer). One
// observer serves every volume.
type fuseObserver struct {
	seconds *prometheus.HistogramVec
	errors  *prometheus.CounterVec
	// byOp caches each operation's histogram (string -> prometheus.Observer),
	// sparing a label lookup per request.
	byOp sync.Map
}

// ObserveOp implements fusefs.Observer.
func (o *fuseObserver) ObserveOp(op string, d time.Duration, errno syscall.Errno) {
	h, ok := o.byOp.Load(op)
	if !ok {
		h, _ = o.byOp.LoadOrStore(op, o.seconds.WithLabelValues(op))
	}
	h.(prometheus.Observer).Observe(d.Seconds())
	if errno != 0 {
		name := unix.ErrnoName(errno)
		if name == "" {
			name = strconv.Itoa(int(errno))
		}
		o.errors.WithLabelValues(op, name).Inc()
	}
}
